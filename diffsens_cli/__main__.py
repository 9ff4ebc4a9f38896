from diffsens_cli.cli import main

main()
