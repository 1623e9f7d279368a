"""Resident memory of file mappings, read from Linux's /proc/self/smaps (tests of bounded memory)."""


def mapped_kib(path_prefix: str) -> int:
  """KiB of this process's resident pages mapped from files whose path starts with the prefix."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()
      if "-" in head[0] and len(head) >= 5:  # a mapping's header line
        inside = len(head) >= 6 and head[5].startswith(path_prefix)
      elif inside and head[0] == "Rss:":
        total += int(head[1])
  return total
