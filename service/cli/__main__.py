"""`python -m service.cli`: the `autointerp` command by module name, which is how torchrun
starts it (`torchrun --standalone --nproc-per-node 2 -m service.cli train ...`)."""

from service.cli import main

main()
