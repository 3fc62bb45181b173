"""Tools of the repository, run from its root as modules (`python -m tools.make_default_assets`); not shipped in
the wheel."""
