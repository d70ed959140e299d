"""``python -m limenex`` runs the command line."""

from limenex.cli import main

if __name__ == "__main__":
    main(prog_name="limenex")
