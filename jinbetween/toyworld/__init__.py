"""A procedural toy world for training small video models: seeded scenes of falling, bouncing, spinning sprites."""

from jinbetween.toyworld.world import (ENCODINGS, MOTIONS, SHAPES, SPLITS, TEXTURES, Background, Scene, Sprite,
                                       Trajectory, WorldConfig, render, sample_scene, split_seeds, trajectory, video,
                                       write_dataset)

__all__ = ["ENCODINGS", "MOTIONS", "SHAPES", "SPLITS", "TEXTURES", "Background", "Scene", "Sprite", "Trajectory",
           "WorldConfig", "render", "sample_scene", "split_seeds", "trajectory", "video", "write_dataset"]
