"""Evaluation: tasks, metrics and the runner that scores a model by greedy generation."""
