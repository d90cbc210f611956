//! Render cost per event: the per-event share of the hot path (params check,
//! template evaluation, body serialisation) on the shipped examples.
//! `cargo bench --bench render`

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use journey_actions::action;
use journey_actions::event::ActionEvent;

fn bench_render(c: &mut Criterion) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let actions =
        action::load_dir(&config.join("actions"), &config).expect("the shipped examples load");
    let idempotency = reqwest::header::HeaderName::from_static("idempotency-key");
    let mut group = c.benchmark_group("render");
    for id in [
        "sms_gateway",
        "email_send",
        "push_notification",
        "crm_webhook",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/events/{id}.json"));
        let bytes = std::fs::read(&path).expect("example event");
        let def = actions.get(id).expect("example action").clone();
        let event = ActionEvent::from_slice(&bytes).expect("valid example event");
        group.bench_function(id, |b| {
            b.iter(|| {
                let missing = def.check_params(&event.params).expect("valid params");
                black_box(
                    def.request
                        .render(black_box(&event), &missing, Some(&idempotency))
                        .expect("renders"),
                )
            })
        });
    }
    group.finish();
    c.bench_function("parse_event+render/sms_gateway", |b| {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events/sms_gateway.json"),
        )
        .unwrap();
        let def = actions.get("sms_gateway").unwrap().clone();
        b.iter(|| {
            let event = ActionEvent::from_slice(black_box(&bytes)).unwrap();
            let missing = def.check_params(&event.params).unwrap();
            black_box(
                def.request
                    .render(&event, &missing, Some(&idempotency))
                    .unwrap(),
            )
        })
    });
}

criterion_group!(benches, bench_render);
criterion_main!(benches);
