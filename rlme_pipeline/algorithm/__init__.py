"""The method's math: rewards and advantages, the label reward, answer matching, losses, log-probs, sampling."""
