"""Applications on top of the package: quickstart, submit, plan, benchmark."""
