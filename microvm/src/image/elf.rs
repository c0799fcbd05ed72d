//! Just enough ELF64 (little-endian) parsing for the image pipeline: note segments (the PVH
//! entry point of `vmlinux`) and named sections (`.modinfo` of kernel modules). Every offset
//! is bounds-checked: the input comes from downloaded packages.

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF64 little-endian file")]
    NotElf64,
    #[error("truncated or malformed ELF ({0})")]
    Malformed(&'static str),
}

pub struct Elf<'a> {
    data: &'a [u8],
}

/// One section header: name, type, file offset, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub offset: u64,
    pub size: u64,
}

/// One ELF note.
#[derive(Debug, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    d.get(off..off.checked_add(2)?)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    d.get(off..off.checked_add(4)?)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    d.get(off..off.checked_add(8)?).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

fn slice(d: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let off = usize::try_from(off).ok()?;
    let len = usize::try_from(len).ok()?;
    d.get(off..off.checked_add(len)?)
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// The fields of one program header this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProgramHeader {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}
const SHT_NOTE: u32 = 7;

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
            return Err(ElfError::NotElf64);
        }
        Ok(Elf { data })
    }

    fn program_headers(&self) -> Result<Vec<ProgramHeader>, ElfError> {
        let d = self.data;
        let bad = ElfError::Malformed("program headers");
        let phoff = u64_at(d, 0x20).ok_or(bad.clone())?;
        let phentsize = u16_at(d, 0x36).ok_or(bad.clone())? as u64;
        let phnum = u16_at(d, 0x38).ok_or(bad.clone())? as u64;
        let mut out = Vec::new();
        for i in 0..phnum {
            let base = i
                .checked_mul(phentsize)
                .and_then(|o| o.checked_add(phoff))
                .and_then(|o| usize::try_from(o).ok())
                .ok_or(bad.clone())?;
            let field = |off: usize| base.checked_add(off).and_then(|o| u64_at(d, o));
            out.push(ProgramHeader {
                kind: u32_at(d, base).ok_or(bad.clone())?,
                offset: field(8).ok_or(bad.clone())?,
                paddr: field(24).ok_or(bad.clone())?,
                filesz: field(32).ok_or(bad.clone())?,
                memsz: field(40).ok_or(bad.clone())?,
            });
        }
        Ok(out)
    }

    /// Bytes of the file that hold the ELF header and every program header: enough for
    /// [`Elf::highest_load_end`] without reading a 60 MB `vmlinux` whole.
    pub fn headers_len(header: &[u8]) -> Result<u64, ElfError> {
        let bad = ElfError::Malformed("program headers");
        let phoff = u64_at(header, 0x20).ok_or(bad.clone())?;
        let phentsize = u16_at(header, 0x36).ok_or(bad.clone())? as u64;
        let phnum = u16_at(header, 0x38).ok_or(bad.clone())? as u64;
        phoff
            .checked_add(phentsize * phnum)
            .map(|end| end.max(64))
            .ok_or(bad)
    }

    /// End of the highest PT_LOAD segment in guest-physical memory (`p_paddr + p_memsz`):
    /// what a loader that places the segments at their physical addresses (Cloud
    /// Hypervisor's PVH boot) needs the guest's RAM to cover, `.bss` included.
    pub fn highest_load_end(&self) -> Result<u64, ElfError> {
        let mut end = None;
        for ph in self.program_headers()? {
            if ph.kind == PT_LOAD {
                let e = ph.paddr.checked_add(ph.memsz).ok_or(ElfError::Malformed(
                    "PT_LOAD segment past the address space",
                ))?;
                end = Some(end.map_or(e, |m: u64| m.max(e)));
            }
        }
        end.ok_or(ElfError::Malformed("no PT_LOAD segment"))
    }

    pub fn sections(&self) -> Result<Vec<Section<'a>>, ElfError> {
        let d = self.data;
        let bad = ElfError::Malformed("section headers");
        let shoff = u64_at(d, 0x28).ok_or(bad.clone())?;
        let shentsize = u16_at(d, 0x3a).ok_or(bad.clone())? as u64;
        let shnum = u16_at(d, 0x3c).ok_or(bad.clone())? as u64;
        let shstrndx = u16_at(d, 0x3e).ok_or(bad.clone())? as u64;
        if shnum == 0 {
            return Ok(Vec::new());
        }
        let hdr = |i: u64| -> Result<(u32, u32, u64, u64), ElfError> {
            let base = usize::try_from(shoff + i * shentsize).map_err(|_| bad.clone())?;
            Ok((
                u32_at(d, base).ok_or(bad.clone())?,
                u32_at(d, base + 4).ok_or(bad.clone())?,
                u64_at(d, base + 0x18).ok_or(bad.clone())?,
                u64_at(d, base + 0x20).ok_or(bad.clone())?,
            ))
        };
        let (_, _, stroff, strsize) = hdr(shstrndx)?;
        let strtab = slice(d, stroff, strsize).ok_or(bad.clone())?;
        let mut out = Vec::new();
        for i in 0..shnum {
            let (name_off, kind, off, size) = hdr(i)?;
            let name = strtab
                .get(name_off as usize..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .unwrap_or(b"");
            out.push(Section {
                name,
                kind,
                offset: off,
                size,
            });
        }
        Ok(out)
    }

    /// Contents of the first section called `name`.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        for sec in self.sections()? {
            if sec.name == name.as_bytes() {
                // SHT_NOBITS has no file contents.
                if sec.kind == 8 {
                    return Ok(Some(&[]));
                }
                return slice(self.data, sec.offset, sec.size)
                    .map(Some)
                    .ok_or(ElfError::Malformed("section out of bounds"));
            }
        }
        Ok(None)
    }

    /// All notes from PT_NOTE segments, or from SHT_NOTE sections when there are no segments.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, ElfError> {
        let mut regions = Vec::new();
        for ph in self.program_headers()? {
            if ph.kind == PT_NOTE {
                regions.push(
                    slice(self.data, ph.offset, ph.filesz).ok_or(ElfError::Malformed("note"))?,
                );
            }
        }
        if regions.is_empty() {
            for sec in self.sections()? {
                if sec.kind == SHT_NOTE {
                    regions.push(
                        slice(self.data, sec.offset, sec.size)
                            .ok_or(ElfError::Malformed("note"))?,
                    );
                }
            }
        }
        let mut notes = Vec::new();
        for r in regions {
            parse_notes(r, &mut notes)?;
        }
        Ok(notes)
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn parse_notes<'a>(mut r: &'a [u8], out: &mut Vec<Note<'a>>) -> Result<(), ElfError> {
    let bad = ElfError::Malformed("note entry");
    while r.len() >= 12 {
        let namesz = u32_at(r, 0).ok_or(bad.clone())? as usize;
        let descsz = u32_at(r, 4).ok_or(bad.clone())? as usize;
        let kind = u32_at(r, 8).ok_or(bad.clone())?;
        let name_end = 12usize.checked_add(namesz).ok_or(bad.clone())?;
        let desc_start = 12 + align4(namesz);
        let desc_end = desc_start.checked_add(descsz).ok_or(bad.clone())?;
        let name = r.get(12..name_end).ok_or(bad.clone())?;
        let desc = r.get(desc_start..desc_end).ok_or(bad.clone())?;
        // Names are NUL-terminated; compare without the terminator.
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        out.push(Note { name, kind, desc });
        let next = align4(desc_end);
        r = r.get(next..).unwrap_or(&[]);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding `notes` (raw note bytes).
    pub(crate) fn elf_with_note_segment(notes: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 64 + 56];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        d[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let off = d.len() as u64;
        d[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        d[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
        d[64 + 32..64 + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        d.extend_from_slice(notes);
        d
    }

    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&((name.len() + 1) as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        n.resize(n.len() + (4 - n.len() % 4) % 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len() + (4 - n.len() % 4) % 4, 0);
        n
    }

    #[test]
    fn reads_notes() {
        let mut notes = note(b"GNU", 3, b"abcd");
        notes.extend(note(b"Xen", 18, &0x100_0000u32.to_le_bytes()));
        let elf = elf_with_note_segment(&notes);
        let parsed = Elf::parse(&elf).unwrap().notes().unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].name, b"Xen");
        assert_eq!(parsed[1].kind, 18);
    }

    /// An ELF64 header followed by PT_LOAD segments `(paddr, memsz)`, no contents.
    fn elf_with_loads(loads: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&(loads.len() as u16).to_le_bytes());
        for &(paddr, memsz) in loads {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&(memsz / 2).to_le_bytes()); // filesz < memsz: .bss
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            d.extend(ph);
        }
        d
    }

    #[test]
    fn highest_load_end_counts_memsz() {
        // Debian 6.1's vmlinux: the last segment (.init, .bss, .brk) ends at 74 MiB.
        let elf = elf_with_loads(&[
            (0x100_0000, 0x18e_a9f0),
            (0x307_9000, 0x198_7000),
            (0x2a0_0000, 0x64_4000),
        ]);
        assert_eq!(Elf::headers_len(&elf).unwrap(), 64 + 3 * 56);
        assert_eq!(
            Elf::parse(&elf).unwrap().highest_load_end().unwrap(),
            74 << 20
        );
        let none = elf_with_loads(&[]);
        assert!(Elf::parse(&none).unwrap().highest_load_end().is_err());
        let wraps = elf_with_loads(&[(u64::MAX, 2)]);
        assert!(Elf::parse(&wraps).unwrap().highest_load_end().is_err());
        // Program headers past the end of the data are an error, not a panic.
        let mut cut = elf_with_loads(&[(0x100_0000, 4096)]);
        cut.truncate(100);
        assert!(Elf::parse(&cut).unwrap().highest_load_end().is_err());
        let mut far = elf_with_loads(&[(0x100_0000, 4096)]);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Elf::parse(&far).unwrap().highest_load_end().is_err());
        assert!(Elf::headers_len(&far).is_err());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(Elf::parse(b"hello").err(), Some(ElfError::NotElf64));
        let mut elf = elf_with_note_segment(&note(b"Xen", 18, b"1234"));
        elf[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Elf::parse(&elf).unwrap().notes().is_err());
    }
}
