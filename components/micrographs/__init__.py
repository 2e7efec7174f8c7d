"""Real micrographs: microscope files (.dm3/.dm4, .emd, .ser, .tif, .png) -> contract examples."""
