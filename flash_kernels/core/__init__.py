"""What every layer above shares and nothing below it: the plan of a call (plan.py), the roles
of z (roles.py), the argument checks (validation.py), the packed documents' index tables
(packing.py), the process's state (environment.py) and the accuracy table (tolerances.py).
Imports torch and numpy only."""
