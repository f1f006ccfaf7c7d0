"""The Worker side: `taskrun-worker`, which runs Agents for the control plane."""
