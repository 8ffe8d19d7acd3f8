"""Field failure cases (ports of shared/cases/caseNN/make.py) as in-repo model builders."""
