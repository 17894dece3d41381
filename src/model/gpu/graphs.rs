//! Decode steps captured as CUDA graphs and replayed: the shapes a step is captured at, and
//! the cache of captured graphs.

use std::sync::atomic::Ordering;

use super::GpuModel;
use super::pass::Pass;
use super::scratch::{Graphs, Scratch};
use crate::Result;
use crate::cuda;
use crate::model::SeqStep;

const MAX_CAPTURE_FAILURES: usize = 3;

impl GpuModel {
    /// The graph a call replays: every sequence decodes one token, graphs are on, and the
    /// batch fits a captured size.
    pub(super) fn graph_shape(
        &self,
        steps: &[SeqStep<'_>],
        block_size: usize,
    ) -> Option<GraphShape> {
        if !self.cuda_graphs.load(Ordering::Relaxed) || steps.iter().any(|s| s.ids.len() != 1) {
            return None;
        }
        let batch = graph_batch(steps.len())?;
        let blocks = steps.iter().map(|s| (s.start + 1).div_ceil(block_size)).max()?;
        Some(GraphShape { batch, max_blocks: blocks.next_power_of_two().max(GRAPH_MIN_BLOCKS) })
    }

    /// Runs the pass as the decode graph of `shape`: captured the second time the shape runs
    /// (the first warms up), replayed from then on; run directly while there is none.
    pub(super) fn run_graph(
        &self,
        s: &Scratch,
        graphs: &mut Graphs,
        arena: &cuda::KvArena,
        pass: &Pass<'_>,
        shape: GraphShape,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let key = (arena.generation(), shape);
        if !graphs.captured.contains_key(&key) && !graphs.warmed_up.insert(shape) {
            match gpu.capture(|| self.queue_pass(s, arena, pass)) {
                Ok(captured) => {
                    if graphs.captured.len() >= MAX_GRAPHS {
                        // Mostly graphs of arenas since grown or dropped.
                        graphs.captured.clear();
                    }
                    // A few dozen a model at most: serving logs show graphs in use.
                    tracing::info!(
                        batch = shape.batch,
                        block_table = shape.max_blocks,
                        graphs = graphs.captured.len() + 1,
                        "captured a decode step as a CUDA graph"
                    );
                    graphs.captured.insert(key, captured);
                }
                Err(e) => {
                    let failures = self.capture_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures >= MAX_CAPTURE_FAILURES {
                        tracing::warn!("CUDA graphs turned off: capturing a decode step: {e}");
                        self.cuda_graphs.store(false, Ordering::Relaxed);
                    } else {
                        // Tried again the next time this shape runs.
                        tracing::warn!("capturing a decode step failed (will retry): {e}");
                        graphs.warmed_up.remove(&shape);
                    }
                }
            }
        }
        match graphs.captured.get(&key) {
            Some(captured) => gpu.replay(captured)?,
            None => self.queue_pass(s, arena, pass)?,
        }
        Ok(())
    }
}

/// What fixes a captured decode step: its batch (sequences past the real ones are padding)
/// and the width of its block tables. Lengths, tokens and blocks vary between replays; they
/// are read from the tables the step uploads first, at offsets these two fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphShape {
    pub(super) batch: usize,
    pub(super) max_blocks: usize,
}

/// Batch sizes decode steps are captured at (a batch runs as the next size up, as vLLM's
/// capture sizes): up to the GEMV kernel's 8 rows in powers of two, then steps of 16, 32,
/// 64 and 128 up to 1,024 sequences (`max_num_seqs`), padding a batch by about a quarter
/// at most. Graphs are captured when a size first runs twice, so unused sizes cost nothing.
const GRAPH_BATCHES: [usize; 25] = [
    1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640,
    768, 896, 1024,
];
/// Narrowest block table of a graph; wider ones double (one graph per doubling).
pub(super) const GRAPH_MIN_BLOCKS: usize = 8;
/// Graphs kept per model before they are all dropped and captured again as needed: every
/// batch size with a few block-table widths, for a few instances.
const MAX_GRAPHS: usize = 256;

/// The captured batch size `sequences` run as; None past the largest (run without a graph).
pub(super) fn graph_batch(sequences: usize) -> Option<usize> {
    GRAPH_BATCHES.iter().copied().find(|&b| b >= sequences.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_batches_run_as_the_next_captured_size() {
        assert_eq!(graph_batch(0), Some(1));
        assert_eq!(graph_batch(1), Some(1));
        assert_eq!(graph_batch(3), Some(4));
        assert_eq!(graph_batch(9), Some(16));
        assert_eq!(graph_batch(64), Some(64));
        assert_eq!(graph_batch(65), Some(80));
        assert_eq!(graph_batch(256), Some(256));
        assert_eq!(graph_batch(257), Some(320));
        assert_eq!(graph_batch(1000), Some(1024));
        assert_eq!(graph_batch(1025), None);
        // Past 128 sequences a batch is padded by at most 1/4 of its size.
        for n in 129..=1024 {
            assert!(graph_batch(n).unwrap() * 4 <= n * 5 + 128, "{n}");
        }
        assert!(GRAPH_BATCHES.windows(2).all(|w| w[0] < w[1]));
    }
}
