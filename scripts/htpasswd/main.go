// htpasswd prints one "user:bcrypt-hash" line for the distribution registry's htpasswd auth, which
// accepts only bcrypt. The user and password come on stdin (two lines), never on the command line,
// so they do not show up in the process list.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	var lines []string
	for in.Scan() {
		lines = append(lines, in.Text())
	}
	if len(lines) != 2 || lines[0] == "" || strings.Contains(lines[0], ":") {
		fmt.Fprintln(os.Stderr, "htpasswd: give the user (no ':') and the password on two lines of stdin")
		os.Exit(2)
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(lines[1]), bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintln(os.Stderr, "htpasswd:", err)
		os.Exit(1)
	}
	fmt.Printf("%s:%s\n", lines[0], hash)
}
