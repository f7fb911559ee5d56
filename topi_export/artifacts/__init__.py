"""What build and run share on disk (docs/design.md, "Layers"): engine directories and their manifests, inputs
files, calibration profiles and method settings, tool versions. Below both the builder and the runtime."""
