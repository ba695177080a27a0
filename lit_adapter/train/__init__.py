"""Training: the Trainer and its loop, objectives, losses, optimizers, guards and start-up checks."""
