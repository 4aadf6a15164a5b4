"""Tasks bundled with the package, each with its data and the build of a base model that reasons on it: the demo,
the docs and the studies run on them with nothing downloaded. ``arithmetic_chains`` is the one task."""
