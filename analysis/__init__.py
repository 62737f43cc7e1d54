"""Analysis of experiment results: scaling-law fits with bootstrap intervals (`analysis.fit`)."""
