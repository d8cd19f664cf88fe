"""Reading finished runs: metrics files, the grid's table, and depth analysis of a model."""
