package rules

import (
	"fmt"
	"strings"
)

// Text renders the ruleset as an nft script, in the layout
// `nft list table inet egressd` prints, plus "#" comments. Loading it with
// `nft -f` replaces the table the same way Ruleset.AddTo does.
func (rs *Ruleset) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# egressd ruleset. Load with: nft -f FILE\n")
	fmt.Fprintf(&b, "# Replaces table inet %[1]s and nothing else.\n", TableName)
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %[1]s\n\n", TableName)
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range rs.Sets {
		sep()
		fmt.Fprintf(&b, "\tset %s {\n", s.Name)
		fmt.Fprintf(&b, "\t\ttype %s\n", [...]string{"ipv4_addr", "ipv6_addr", "inet_service"}[s.Type])
		if s.Timeout {
			b.WriteString("\t\tflags timeout\n")
		} else if len(s.Ports) > 0 {
			b.WriteString("\t\tflags constant\n")
		}
		if s.Comment != "" {
			fmt.Fprintf(&b, "\t\tcomment %q\n", s.Comment)
		}
		if len(s.Ports) > 0 {
			elems := make([]string, len(s.Ports))
			for i, p := range s.Ports {
				elems[i] = fmt.Sprint(p)
			}
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
		}
		b.WriteString("\t}\n")
	}
	for _, c := range rs.Chains {
		sep()
		comment(&b, "\t", c.Comment)
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if h := c.Hook; h != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %s; policy accept;\n", h.Type, h.Hook, priorityName(h))
		}
		for _, r := range c.Rules {
			comment(&b, "\t\t", r.Comment)
			fmt.Fprintf(&b, "\t\t%s\n", r.Text())
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func comment(b *strings.Builder, indent, text string) {
	if text != "" {
		fmt.Fprintf(b, "%s# %s\n", indent, text)
	}
}

// priorityName spells a priority the way nft lists it.
func priorityName(h *Hook) string {
	switch {
	case h.Type == "filter" && h.Priority == priorityFilter:
		return "filter"
	case h.Hook == "prerouting" && h.Priority == priorityDstNAT:
		return "dstnat"
	case h.Hook == "prerouting" && h.Priority == priorityRedirect:
		return "dstnat - 1"
	case h.Priority == priorityRaw:
		return "raw"
	}
	return fmt.Sprint(h.Priority)
}
