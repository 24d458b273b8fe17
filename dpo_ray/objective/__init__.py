"""What is optimised: the loss spec (torch-free), the loss functions and the metrics of their outputs."""
