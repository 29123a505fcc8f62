"""Speed: training and inference against the usual way and the strongest peers; data loading."""
