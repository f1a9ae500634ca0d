//! sgps: offline few-shot medical image classification.
pub mod classifier;
pub mod cli;
pub mod encoders;
pub mod error;
pub mod image_io;
pub mod manifest;
pub mod pipeline;
pub mod preprocess;
pub mod support;
pub mod synthesizer;
pub mod board;
pub mod camera;
pub mod gpio;
pub mod quality;
pub mod store;
pub mod app;
