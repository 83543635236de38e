"""How faces are found and aligned: MTCNN (facenet-pytorch's networks and weights, without
torchvision), its resampling, and the 5-point similarity alignment. Imports nothing else of ours."""
