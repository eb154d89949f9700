from opspolish.cli import main

main(prog_name="opspolish")
