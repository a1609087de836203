"""Experiments (`vitmpp.experiments`): what is built from both stages, in the layer above them.

* compare.py: the comparison's command (`python -m vitmpp.experiments.compare`, `./launch.sh compare`);
* grid.py: its config and cells; runner.py: its processes; report.py: its tables and figures.
"""
