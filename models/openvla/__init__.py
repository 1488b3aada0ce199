"""OpenVLA (Prismatic DINOv2+SigLIP -> MLP projector -> Llama-2) with local-checkpoint loading."""
