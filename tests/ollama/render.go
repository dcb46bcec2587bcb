// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama itself uses, over a conversation read as
// JSON from stdin: {"template": "...", "messages": [{"role": "user", "content": "..."}], "system": "..."}.
// The data has the fields Ollama's template.Values gives a template: .Messages (.Role, .Content), .System,
// .Prompt, .Response.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
}

func main() {
	var input Input
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("ollama").Parse(input.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(1)
	}
	values := map[string]any{"Messages": input.Messages, "System": input.System, "Prompt": "", "Response": ""}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "template does not execute:", err)
		os.Exit(1)
	}
}
