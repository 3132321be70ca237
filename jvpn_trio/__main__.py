from jvpn_trio.cli import main

raise SystemExit(main())
