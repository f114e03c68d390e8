from amtl_compress.cli import main

main()
