"""Ray Tune ablation studies (the paper's Tables 3-5)."""
