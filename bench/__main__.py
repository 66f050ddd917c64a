"""`python -m bench`: the main job. Times the chunked path against the dense reference over T."""
from .linear_vs_quadratic import main

main()
