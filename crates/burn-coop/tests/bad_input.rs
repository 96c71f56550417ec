//! Property tests of the parsers and file readers: arbitrary input never panics and never
//! hangs; it either parses into something valid or is a typed error. Each parser gets a few
//! thousand seeded cases (random text or bytes, and small edits of valid inputs).

use std::collections::BTreeMap;

use burn_coop::comm::NetworkModel;
use burn_coop::compress::Compressor;
use burn_coop::registry::serde_name;
use burn_coop::state::{StateFile, StateRecord};
use burn_coop::testing::inputs::{Inputs, never_panics};
use burn_coop::topology::{Topology, TopologySpec, WeightRule};

const CASES: usize = 3000;

#[test]
fn compressor_specs_parse_or_are_refused() {
    let valid = ["identity", "topk:0.01", "topk:0.1+sign", "randk:0.5", "sign", "qsgd:16", "bf16", "fp16"];
    let texts = Inputs::new(1).texts(&valid, "topkrandsignqgdbf16:+.-e0123456789 ", CASES);
    let parsed = never_panics(&texts, |text| text.parse::<Compressor>());
    let mut accepted = 0;
    for (text, result) in texts.iter().zip(parsed) {
        if let Ok(compressor) = result {
            accepted += 1;
            // What parses prints back to itself (no silent rewriting of a setting).
            assert_eq!(compressor.to_string().parse::<Compressor>(), Ok(compressor), "{text}");
        }
    }
    assert!(accepted > 50 && accepted < CASES / 2, "{accepted} accepted: the cases must reach both paths");
}

#[test]
fn network_specs_parse_into_finite_costs_or_are_refused() {
    let valid = ["bandwidth=1Gbit,latency=50us", "bandwidth=100MB", "bandwidth=10Mbit,latency=1ms"];
    let texts = Inputs::new(2).texts(&valid, "bandwithlcyGMKbitBsmu=,.0123456789e-+ ", CASES);
    let parsed = never_panics(&texts, |text| text.parse::<NetworkModel>());
    let accepted: Vec<NetworkModel> = parsed.into_iter().filter_map(Result::ok).collect();
    assert!(accepted.len() > 50, "{} accepted", accepted.len());
    for network in accepted {
        assert!(network.bandwidth.is_finite() && network.bandwidth > 0.0, "{network:?}");
        assert!(network.latency.is_finite() && network.latency >= 0.0, "{network:?}");
    }
}

#[test]
fn topology_specs_and_graphs_build_or_are_refused() {
    let valid = ["ring", "torus", "exponential", "complete", "one-peer-exponential"];
    let texts = Inputs::new(3).texts(&valid, "ringtoruscompleexp-", CASES);
    never_panics(&texts, |text| serde_name::<TopologySpec>(text));
    let mut inputs = Inputs::new(4);
    let sizes: Vec<usize> = (0..150).map(|k| if k < 100 { k } else { inputs.below(2000) }).collect();
    for spec in [TopologySpec::Ring, TopologySpec::Torus, TopologySpec::Exponential, TopologySpec::Complete] {
        let sizes = sizes.iter().filter(|&&m| m <= 200 || spec != TopologySpec::Complete);
        never_panics(sizes.copied(), |&m| match spec.build(m) {
            Ok(topology) if m <= 64 => {
                let w = topology.mixing_matrix(WeightRule::MetropolisHastings).expect("a built graph mixes");
                assert_eq!(w.order(), m);
            }
            _ => {}
        });
    }
    // Arbitrary adjacency matrices, square or not, symmetric or not.
    let matrices: Vec<Vec<Vec<bool>>> = (0..CASES / 3)
        .map(|_| {
            let rows = inputs.below(7);
            let ragged = inputs.below(10) == 0;
            (0..rows)
                .map(|_| (0..rows + usize::from(ragged) * inputs.below(2)).map(|_| inputs.below(2) == 1).collect())
                .collect()
        })
        .collect();
    let built = never_panics(matrices.iter().cloned(), |adjacency| {
        Topology::from_adjacency(adjacency.clone()).map(|t| t.mixing_matrix(WeightRule::BestConstant))
    });
    assert!(built.iter().filter(|r| r.is_ok()).count() > 20, "some arbitrary graphs are connected and valid");
    for result in built.into_iter().flatten() {
        result.expect("a valid graph always has a valid mixing matrix");
    }
}

#[test]
fn state_files_read_back_or_are_refused() {
    let rule = StateRecord::new().with_buffer("anchor", vec![1.0, -0.0, 3.5]).with_scalar("momentum", 0.9);
    let file = StateFile { records: BTreeMap::from([("rule".to_string(), rule)]) };
    let valid = file.to_bytes();
    let inputs = Inputs::new(5).bytes(&valid, CASES);
    let read = never_panics(&inputs, |bytes| StateFile::from_bytes(bytes));
    for (bytes, result) in inputs.iter().zip(read) {
        if let Ok(back) = result {
            // Only an unchanged file reads back (the checksum covers every byte).
            assert_eq!(bytes, &valid);
            assert_eq!(back, file);
        }
    }
}
