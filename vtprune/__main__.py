from vtprune.cli import main

main()
