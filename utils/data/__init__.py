"""Training data: InsightFace RecordIO (read and written without mxnet), image folders, generated
identity sets, datasets and samplers, DataLoader worker set-up, integrity checks. May import
utils.config and utils.run.stop (worker signals); never the models, heads or trainer."""
