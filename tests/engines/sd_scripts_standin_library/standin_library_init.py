"""Stand-ins for the parts of sd-scripts' `library` package that its pre-training checks use.

They exist because sd-scripts cannot run here (no checkout in CI); each reproduces the behaviour the
launcher's engine preflight depends on, with the line at the pinned commit that it stands for.
A test uses a real checkout instead when SD_SCRIPTS_DIR and SD_SCRIPTS_PYTHON point to one.
"""
