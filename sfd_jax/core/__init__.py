"""Small helpers shared by every part: paths, trees, images, writers, progress."""
