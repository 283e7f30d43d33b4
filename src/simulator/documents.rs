//! Real report documents for the simulator, generated in-process: a PDF whose text
//! layer names the company (CJK text through a ToUnicode map, so any extractor finds
//! it) and a DOCX that Word, LibreOffice and python-docx open. Both are deterministic
//! in their inputs, so a re-download serves the same bytes.

use std::fmt::Write as _;
use std::io::{Cursor, Write as _};

/// What a report is about.
#[derive(Debug, Clone)]
pub struct ReportContent {
    pub company: String,
    pub job_id: u64,
    pub generated_at: String,
    /// Roughly how large the document should be, in bytes.
    pub target_size: usize,
}

impl ReportContent {
    fn title(&self) -> String {
        format!("{} 企业创新能力报告", self.company)
    }

    /// Deterministic body paragraphs, as many as the target size needs.
    fn paragraphs(&self, approx_bytes: usize) -> Vec<String> {
        let sections = [
            "专利申请趋势",
            "技术领域分布",
            "核心发明人",
            "专利价值评估",
            "竞争对手对比",
            "研发投入分析",
        ];
        let mut out = Vec::new();
        let mut size = 0;
        let mut seed = self.job_id ^ 0x9E37_79B9_7F4A_7C15;
        let mut i = 0usize;
        while size < approx_bytes {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let section = sections[i % sections.len()];
            let p = format!(
                "第{}节 {}：{} 在该领域共有 {} 件专利申请，其中发明专利占比 {}.{}%，近五年复合增长率 {}.{}%。Patent family index {}.",
                i + 1,
                section,
                self.company,
                (seed >> 8) % 5000 + 10,
                (seed >> 20) % 100,
                (seed >> 27) % 10,
                (seed >> 31) % 60,
                (seed >> 37) % 10,
                seed % 100_000
            );
            size += p.len();
            out.push(p);
            i += 1;
        }
        out
    }
}

/// UTF-16BE hex for a PDF string shown through the UniGB-UCS2-H font (BMP only).
fn ucs2_hex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 4 + 2);
    out.push('<');
    for c in s.chars() {
        let code = if (c as u32) <= 0xFFFF && !(0xD800..=0xDFFF).contains(&(c as u32)) {
            c as u32
        } else {
            '?' as u32
        };
        let _ = write!(out, "{code:04X}");
    }
    out.push('>');
    out
}

/// Splits text into lines of at most `width` display units (CJK counts 2).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut w = 0;
    for c in text.chars() {
        let cw = if c.is_ascii() { 1 } else { 2 };
        if w + cw > width {
            lines.push(std::mem::take(&mut line));
            w = 0;
        }
        line.push(c);
        w += cw;
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A PDF 1.4 report with a text layer; `pdftotext` finds the company name in it.
pub fn pdf_report(content: &ReportContent) -> Vec<u8> {
    let mut lines = vec![
        content.title(),
        "Enterprise Innovation Capability Report".to_string(),
        format!("企业名称 Company: {}", content.company),
        format!("任务编号 Job: {}", content.job_id),
        format!("生成时间 Generated: {}", content.generated_at),
        String::new(),
    ];
    for p in content.paragraphs(content.target_size.saturating_sub(9000) / 2) {
        lines.extend(wrap(&p, 84));
        lines.push(String::new());
    }
    let pages: Vec<&[String]> = lines.chunks(46).collect();

    // Objects 1..=6 are fixed; then a (page, contents) pair per page; then Info.
    let mut objects: Vec<Vec<u8>> = Vec::new();
    let page_ids: Vec<usize> = (0..pages.len()).map(|i| 7 + 2 * i).collect();
    let info_id = 7 + 2 * pages.len();
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    let kids: String = page_ids.iter().map(|id| format!("{id} 0 R ")).collect();
    objects.push(format!("<< /Type /Pages /Kids [{kids}] /Count {} >>", pages.len()).into_bytes());
    objects.push(
        b"<< /Type /Font /Subtype /Type0 /BaseFont /STSong-Light /Encoding /UniGB-UCS2-H /DescendantFonts [4 0 R] /ToUnicode 5 0 R >>"
            .to_vec(),
    );
    objects.push(
        b"<< /Type /Font /Subtype /CIDFontType0 /BaseFont /STSong-Light /CIDSystemInfo << /Registry (Adobe) /Ordering (GB1) /Supplement 2 >> /FontDescriptor 6 0 R /DW 1000 /W [1 95 500] >>"
            .to_vec(),
    );
    objects.push(stream_object(&to_unicode_cmap()));
    objects.push(
        b"<< /Type /FontDescriptor /FontName /STSong-Light /Flags 6 /FontBBox [-25 -254 1000 880] /ItalicAngle 0 /Ascent 880 /Descent -120 /CapHeight 880 /StemV 93 >>"
            .to_vec(),
    );
    for (i, page) in pages.iter().enumerate() {
        let contents_id = page_ids[i] + 1;
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >> /Contents {contents_id} 0 R >>"
            )
            .into_bytes(),
        );
        let mut text = String::from("BT\n/F1 11 Tf\n14 TL\n40 800 Td\n");
        for line in page.iter() {
            let _ = writeln!(text, "{} Tj T*", ucs2_hex(line));
        }
        let _ = writeln!(text, "ET");
        objects.push(stream_object(text.as_bytes()));
    }
    objects.push(
        format!(
            "<< /Title {} /Producer (report-worker simulator) >>",
            utf16_text_string(&content.title())
        )
        .into_bytes(),
    );

    let mut out = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref_at = out.len();
    let mut xref = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for off in offsets {
        let _ = writeln!(xref, "{off:010} 00000 n ");
    }
    let _ = write!(
        xref,
        "trailer\n<< /Size {} /Root 1 0 R /Info {info_id} 0 R >>\nstartxref\n{xref_at}\n%%EOF\n",
        objects.len() + 1
    );
    out.extend_from_slice(xref.as_bytes());
    out
}

fn stream_object(data: &[u8]) -> Vec<u8> {
    let mut v = format!("<< /Length {} >>\nstream\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\nendstream");
    v
}

fn utf16_text_string(s: &str) -> String {
    let mut out = String::from("<FEFF");
    for unit in s.encode_utf16() {
        let _ = write!(out, "{unit:04X}");
    }
    out.push('>');
    out
}

/// Codes of UniGB-UCS2-H are UCS-2 code units, so the map to Unicode is the identity
/// (surrogates excluded), written as bfrange blocks of at most 100 entries.
fn to_unicode_cmap() -> Vec<u8> {
    let ranges: Vec<u32> = (0u32..=0xFF)
        .filter(|hi| !(0xD8..=0xDF).contains(hi))
        .collect();
    let mut s = String::from(
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n",
    );
    for block in ranges.chunks(100) {
        let _ = writeln!(s, "{} beginbfrange", block.len());
        for hi in block {
            let _ = writeln!(s, "<{hi:02X}00> <{hi:02X}FF> <{hi:02X}00>");
        }
        let _ = writeln!(s, "endbfrange");
    }
    s.push_str("endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n");
    s.into_bytes()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A DOCX (OOXML) report. Parts are stored uncompressed so the size tracks the target.
pub fn docx_report(content: &ReportContent) -> Vec<u8> {
    let mut body = String::new();
    let para = |text: &str, bold: bool| {
        let rpr = if bold { "<w:rPr><w:b/></w:rPr>" } else { "" };
        format!(
            "<w:p><w:r>{rpr}<w:t xml:space=\"preserve\">{}</w:t></w:r></w:p>",
            xml_escape(text)
        )
    };
    body.push_str(&para(&content.title(), true));
    body.push_str(&para("Enterprise Innovation Capability Report", false));
    body.push_str(&para(
        &format!("企业名称 Company: {}", content.company),
        false,
    ));
    body.push_str(&para(&format!("任务编号 Job: {}", content.job_id), false));
    body.push_str(&para(
        &format!("生成时间 Generated: {}", content.generated_at),
        false,
    ));
    for p in content.paragraphs(content.target_size.saturating_sub(2000) * 2 / 3) {
        body.push_str(&para(&p, false));
    }
    let document = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<w:document xmlns:w=\"http://schemas.openxmlformats.org/wordprocessingml/2006/main\"><w:body>{body}<w:sectPr><w:pgSz w:w=\"11906\" w:h=\"16838\"/></w:sectPr></w:body></w:document>"
    );
    let parts: [(&str, String); 5] = [
        (
            "[Content_Types].xml",
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<Types xmlns=\"http://schemas.openxmlformats.org/package/2006/content-types\"><Default Extension=\"rels\" ContentType=\"application/vnd.openxmlformats-package.relationships+xml\"/><Default Extension=\"xml\" ContentType=\"application/xml\"/><Override PartName=\"/word/document.xml\" ContentType=\"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml\"/><Override PartName=\"/docProps/core.xml\" ContentType=\"application/vnd.openxmlformats-package.core-properties+xml\"/></Types>".into(),
        ),
        (
            "_rels/.rels",
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<Relationships xmlns=\"http://schemas.openxmlformats.org/package/2006/relationships\"><Relationship Id=\"rId1\" Type=\"http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument\" Target=\"word/document.xml\"/><Relationship Id=\"rId2\" Type=\"http://schemas.openxmlformats.org/package/2006/relationships/metadata/core-properties\" Target=\"docProps/core.xml\"/></Relationships>".into(),
        ),
        (
            "docProps/core.xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<cp:coreProperties xmlns:cp=\"http://schemas.openxmlformats.org/package/2006/metadata/core-properties\" xmlns:dc=\"http://purl.org/dc/elements/1.1/\"><dc:title>{}</dc:title><dc:creator>report-worker simulator</dc:creator></cp:coreProperties>",
                xml_escape(&content.title())
            ),
        ),
        (
            "word/_rels/document.xml.rels",
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<Relationships xmlns=\"http://schemas.openxmlformats.org/package/2006/relationships\"></Relationships>".into(),
        ),
        ("word/document.xml", document),
    ];
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    for (name, data) in parts {
        zip.start_file(name, options).expect("in-memory zip");
        zip.write_all(data.as_bytes()).expect("in-memory zip");
    }
    zip.finish().expect("in-memory zip").into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ReportType;
    use crate::upstream::document::check_report;

    fn content(size: usize) -> ReportContent {
        ReportContent {
            company: "小米科技有限责任公司".into(),
            job_id: 1579434053399035904,
            generated_at: "2026-11-28".into(),
            target_size: size,
        }
    }

    #[test]
    fn documents_pass_the_clients_checks_and_are_deterministic() {
        let pdf = pdf_report(&content(300_000));
        assert!(check_report(&pdf, ReportType::Pdf).is_ok());
        assert!(pdf.len() > 200_000 && pdf.len() < 450_000, "{}", pdf.len());
        assert_eq!(pdf, pdf_report(&content(300_000)));
        let docx = docx_report(&content(300_000));
        assert!(check_report(&docx, ReportType::Word).is_ok());
        assert!(
            docx.len() > 200_000 && docx.len() < 450_000,
            "{}",
            docx.len()
        );
        assert_eq!(docx, docx_report(&content(300_000)));
        assert!(check_report(&pdf_report(&content(1_000)), ReportType::Pdf).is_ok());
    }
}
