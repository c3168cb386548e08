// kstatus prints what sigs.k8s.io/cli-utils' kstatus (the status library behind Flux's health checks
// and `kubectl wait`-style tools) computes for Kubernetes objects: one JSON object per input object.
//
// Input on stdin: one object, or a list (`kubectl get -o json`). Output on stdout, one line per object:
// {"name": ..., "status": "InProgress|Failed|Current|Terminating|Unknown", "message": ...}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var obj unstructured.Unstructured
	if err := obj.UnmarshalJSON(data); err != nil {
		fail(err)
	}
	items := []unstructured.Unstructured{obj}
	if obj.IsList() {
		list, err := obj.ToList()
		if err != nil {
			fail(err)
		}
		items = list.Items
	}
	out := json.NewEncoder(os.Stdout)
	for i := range items {
		result, err := status.Compute(&items[i])
		if err != nil {
			fail(err)
		}
		if err := out.Encode(verdict{items[i].GetName(), string(result.Status), result.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(2)
}
