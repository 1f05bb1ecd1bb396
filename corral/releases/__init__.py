"""Runner releases: publishing them, and turning one into files for a sandbox or a layer."""
