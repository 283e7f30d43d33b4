//! Inline SVG charts, drawn on the server (no script, no library): stacked bars over
//! time. Colours come from the stylesheet's classes, so light and dark themes both read.

use maud::{Markup, html};

/// One series of a stacked bar chart: its CSS class and legend name.
pub struct Series<'a> {
    pub class: &'a str,
    pub name: &'a str,
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;
/// Room under the bars' baseline.
const BASE: f64 = 2.0;

/// A stacked bar chart: one bar per bucket, one segment per series. `values[i][s]` is
/// bucket `i`'s value of series `s`; `labels` are the first and last buckets' names (the
/// x axis) and `title` is what a screen reader announces.
pub fn stacked_bars(
    title: &str,
    series: &[Series<'_>],
    values: &[Vec<i64>],
    labels: (&str, &str),
) -> Markup {
    let max = values
        .iter()
        .map(|v| v.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let n = values.len().max(1) as f64;
    let slot = WIDTH / n;
    let bar = (slot * 0.8).max(1.0);
    let plot = HEIGHT - BASE;
    let total: i64 = values.iter().flatten().sum();
    let mut rects = Vec::new();
    for (i, bucket) in values.iter().enumerate() {
        let mut y = plot;
        for (s, v) in bucket.iter().enumerate().filter(|(_, v)| **v > 0) {
            let h = (*v as f64 / max as f64) * (plot - 4.0);
            y -= h;
            let (class, name) = series.get(s).map(|x| (x.class, x.name)).unwrap_or(("", ""));
            let x = i as f64 * slot + (slot - bar) / 2.0;
            rects.push((class, name, *v, x, y, h));
        }
    }
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(format!("{title}: {total} in all, at most {max} in one bar")) preserveAspectRatio="none" {
                title { (title) }
                line.axis x1="0" y1=(plot) x2=(WIDTH) y2=(plot) {}
                @for (class, name, v, x, y, h) in &rects {
                    rect class=(class) x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{bar:.1}")) height=(format!("{h:.1}")) {
                        title { (name) ": " (v) }
                    }
                }
            }
            div.ticks aria-hidden="true" { span { (labels.0) } span { "max " (max) } span { (labels.1) } }
            figcaption {
                (title)
                @for s in series {
                    " " span.key { span class=(format!("swatch {}", s.class)) {} (s.name) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(values: &[Vec<i64>]) -> String {
        stacked_bars(
            "Finished per minute",
            &[
                Series {
                    class: "ok",
                    name: "succeeded",
                },
                Series {
                    class: "bad",
                    name: "failed",
                },
            ],
            values,
            ("−60 min", "now"),
        )
        .into_string()
    }

    #[test]
    fn one_rect_per_non_zero_segment() {
        let svg = chart(&[vec![3, 1], vec![0, 0], vec![2, 0]]);
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("6 in all, at most 4 in one bar"));
    }

    #[test]
    fn the_tallest_bar_fills_the_plot() {
        let svg = chart(&[vec![5, 0], vec![10, 0]]);
        // plot height 118 minus 4 of headroom
        assert!(svg.contains("height=\"114.0\""), "{svg}");
        assert!(svg.contains("height=\"57.0\""), "{svg}");
    }

    #[test]
    fn empty_data_draws_an_empty_axis() {
        let svg = chart(&[]);
        assert_eq!(svg.matches("<rect").count(), 0);
        assert!(svg.contains("0 in all"));
    }

    #[test]
    fn titles_are_escaped() {
        let svg = stacked_bars("<b>", &[], &[], ("<", ">")).into_string();
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("&lt;b&gt;"));
    }
}
