from qconv.cli.main import main

main()
