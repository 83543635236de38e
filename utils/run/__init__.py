"""A run's lifecycle: plan (steps, LR schedule), state across ranks (output folder, resume), checkpoints,
stops (signals, dead DataLoader workers), logging and the summary. May import utils.config,
utils.devices and utils.data; nothing here imports the trainer, the models or the heads."""
