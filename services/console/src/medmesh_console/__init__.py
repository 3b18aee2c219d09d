"""The medmesh console: a read-only web view of models, rollouts, lag, dead letters and reports."""
