use super::*;
use proptest::prelude::*;

fn any_group() -> impl Strategy<Value = Group> {
    prop_oneof![
        (0u32..500, 0u32..64).prop_map(|(mb, chunk)| Group::Stash { mb, chunk }),
        (0u32..64).prop_map(|chunk| Group::Weights { chunk }),
        (0u32..64).prop_map(|chunk| Group::Grads { chunk }),
        (0u32..64, 0u32..8).prop_map(|(chunk, slice)| Group::Optimizer { chunk, slice }),
    ]
}

fn any_action() -> impl Strategy<Value = Action> {
    let mc = (0u32..500, 0u32..64);
    let mcp = (0u32..500, 0u32..64, 0u32..64);
    prop_oneof![
        (mc.clone(), any::<bool>()).prop_map(|((mb, chunk), drop_stash)| Action::Forward {
            mb,
            chunk,
            drop_stash
        }),
        mc.clone()
            .prop_map(|(mb, chunk)| Action::Recompute { mb, chunk }),
        mc.prop_map(|(mb, chunk)| Action::Backward { mb, chunk }),
        mcp.clone()
            .prop_map(|(mb, chunk, peer)| Action::SendAct { mb, chunk, peer }),
        mcp.clone()
            .prop_map(|(mb, chunk, peer)| Action::RecvAct { mb, chunk, peer }),
        mcp.clone()
            .prop_map(|(mb, chunk, peer)| Action::SendGrad { mb, chunk, peer }),
        mcp.prop_map(|(mb, chunk, peer)| Action::RecvGrad { mb, chunk, peer }),
        any_group().prop_map(Action::Offload),
        any_group().prop_map(Action::Prefetch),
        (0u32..64, 0u32..8).prop_map(|(chunk, slice)| Action::Step { chunk, slice }),
        (0u32..64, any::<bool>()).prop_map(|(chunk, shard)| Action::Reduce { chunk, shard }),
        (0u32..64).prop_map(|chunk| Action::Gather { chunk }),
        Just(Action::Tie),
    ]
}

proptest! {
    #[test]
    fn every_action_round_trips(a in any_action()) {
        let text = a.to_string();
        prop_assert!(!text.contains(' '));
        prop_assert_eq!(text.parse::<Action>().unwrap(), a);
    }
}

#[test]
fn text_forms_read_as_documented() {
    assert_eq!("F3.1".parse::<Action>().unwrap(), Action::forward(3, 1));
    assert_eq!(
        "SA3.1>2".parse::<Action>().unwrap(),
        Action::SendAct {
            mb: 3,
            chunk: 1,
            peer: 2
        }
    );
    assert_eq!(
        "OFF:O1".parse::<Action>().unwrap(),
        Action::Offload(Group::Optimizer { chunk: 1, slice: 0 })
    );
    assert_eq!(
        "AR2".parse::<Action>().unwrap(),
        Action::Reduce {
            chunk: 2,
            shard: false
        }
    );
    assert_eq!(
        "RS2".parse::<Action>().unwrap(),
        Action::Reduce {
            chunk: 2,
            shard: true
        }
    );
    assert_eq!(
        "AG2".parse::<Action>().unwrap(),
        Action::Gather { chunk: 2 }
    );
    for bad in [
        "", "X1.2", "F1", "F1.x", "SA1.2", "OFF:Q1", "STEP", "AR", "AR1.2", "RS", "AG1.0",
    ] {
        assert!(bad.parse::<Action>().is_err(), "{bad}");
    }
}

#[test]
fn a_plan_round_trips_and_errors_name_the_line() {
    let text = "microbatches 1\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\ndevice 0: F0.0 SA0.0>1 RG0.1<1 B0.0 STEP0\ndevice 1: RA0.0<0 F0.1 B0.1 SG0.1>0 STEP1\n";
    let plan: Plan = text.parse().unwrap();
    assert_eq!(plan.to_string(), text);
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    let err = "microbatches 1\ndevice 0: F0.0 Q1"
        .parse::<Plan>()
        .unwrap_err();
    assert!(matches!(err, PlanError::Parse { line: 2, .. }), "{err}");
}

#[test]
fn a_replicated_plan_round_trips_in_text_and_json() {
    let text = "microbatches 1\nreplicas 2\nchunk 0 device 0 embedding layers 0..1 head\ndevice 0: F0.0 B0.0 AR0 STEP0\n";
    let plan: Plan = text.parse().unwrap();
    assert_eq!(plan.replicas, 2);
    assert_eq!(plan.total_devices(), 2);
    assert_eq!(plan.to_string(), text);
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    // Plans written before replicas existed read as one replica.
    let old = r#"{"microbatches":1,"chunks":[],"programs":[]}"#;
    assert_eq!(serde_json::from_str::<Plan>(old).unwrap().replicas, 1);
}
