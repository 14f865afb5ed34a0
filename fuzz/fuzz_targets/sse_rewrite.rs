//! Any upstream stream, cut anywhere: the splitter and the event rewriter answer, and never
//! hold more than one event's worth.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate_mcp::{rewrite_event_data, SseSplitter};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(stream.len());
    let mut splitter = SseSplitter::new(4096);
    for chunk in [&stream[..cut], &stream[cut..]] {
        let Ok(events) = splitter.push(chunk) else {
            return;
        };
        for event in events {
            let _ = rewrite_event_data(&event, |message| {
                if let Some(tools) = message.pointer_mut("/result/tools") {
                    *tools = serde_json::Value::Array(Vec::new());
                    return true;
                }
                false
            });
        }
    }
    let _ = splitter.finish();
});
