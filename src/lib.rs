//! sgps: offline few-shot medical image classification.
