//! The response formats of OpenAI's transcription endpoints: plain text,
//! SubRip (`srt`) and WebVTT (`vtt`) subtitles.

use crate::recognize::Segment;

/// The `response_format`s of OpenAI's transcription endpoints.
pub const RESPONSE_FORMATS: [&str; 5] = ["json", "text", "srt", "verbose_json", "vtt"];

fn stamp(t: f64, sep: char) -> String {
    let ms = (t.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

/// SubRip subtitles, one cue per segment.
pub fn srt(segments: &[Segment]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            i + 1,
            stamp(s.start, ','),
            stamp(s.end, ','),
            s.text.trim().replace("-->", "->")
        ));
    }
    out
}

/// WebVTT subtitles, one cue per segment.
pub fn vtt(segments: &[Segment]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for s in segments {
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            stamp(s.start, '.'),
            stamp(s.end, '.'),
            s.text.trim().replace("-->", "->")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: f64, end: f64, text: &str) -> Segment {
        Segment {
            id: 0,
            seek: 0,
            start,
            end,
            text: text.into(),
            tokens: Vec::new(),
            temperature: 0.0,
            avg_logprob: 0.0,
            compression_ratio: 1.0,
            no_speech_prob: 0.0,
        }
    }

    #[test]
    fn cues_are_numbered_and_timed() {
        let s = [
            seg(0.0, 2.5, " 你好，世界。"),
            seg(3661.25, 3662.0, " a --> b"),
        ];
        assert_eq!(
            srt(&s),
            "1\n00:00:00,000 --> 00:00:02,500\n你好，世界。\n\n2\n01:01:01,250 --> 01:01:02,000\na -> b\n\n"
        );
        assert!(vtt(&s).starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n你好，世界。\n\n"));
    }
}
