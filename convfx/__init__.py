"""convfx: low-rank factorization of trained CNNs as a torch.fx compiler pass."""
