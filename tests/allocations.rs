//! Regression guard for the per-event hot path that does not depend on timing
//! (issue 4): the heap allocations made to parse, check and render one event
//! of each shipped example are counted and held to a budget. A change that
//! clones the event, the context or the request per leaf shows up here as a
//! failure, on any machine, however noisy.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use journey_actions::action;
use journey_actions::event::ActionEvent;

/// Counts the allocations of the current thread (tests run in parallel).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_of(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// Budgets: what each example costs today (in parentheses) plus about 25 %.
const BUDGETS: &[(&str, u64)] = &[
    ("sms_gateway", 58), // (46; 49 before payload values were written from the event, 53 before the event's objects were lists, 150 before the render shortcut and the direct parse)
    ("email_send", 59),  // (47; 62; 66; 166)
    ("push_notification", 68), // (54; 55; 59; 137)
    ("crm_webhook", 85), // (68; 75; 79; 150)
];

#[test]
fn parsing_checking_and_rendering_an_event_stays_within_its_allocation_budget() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("config");
    let actions = action::load_dir(&config.join("actions"), &config).expect("examples load");
    let idempotency = reqwest::header::HeaderName::from_static("idempotency-key");
    let mut report = Vec::new();
    for (id, budget) in BUDGETS {
        let bytes = std::fs::read(root.join(format!("examples/events/{id}.json"))).unwrap();
        let def = actions.get(id).expect("example action").clone();
        let once = || {
            let event = ActionEvent::from_slice(&bytes).expect("valid example event");
            let missing = def.check_params(&event.params).expect("valid params");
            let request = def
                .request
                .render(&event, &missing, Some(&idempotency))
                .expect("renders");
            assert!(request.body.is_some());
        };
        once(); // first use: lazily built state is not per-event cost
        let counted = allocations_of(once);
        assert!(counted > 10, "{id}: the counting allocator sees nothing");
        report.push(format!("{id}: {counted} allocations (budget {budget})"));
        assert!(
            counted <= *budget,
            "{id}: {counted} allocations per event, over the budget of {budget}:\n{}",
            report.join("\n")
        );
    }
    println!("{}", report.join("\n"));
}
