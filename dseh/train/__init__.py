"""Training: the one loop (loop.py), the LabNet and image-network phases that plug into it
(phases.py), the image data feed (feed.py), and device, data-parallel and determinism setup
(device.py). Methods' objectives are in dseh.methods."""
